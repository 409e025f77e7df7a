"""Online / iterative DPO as one Ray pipeline (``raydpo online``).

Each round: prompts -> generator pool (:mod:`.generate`) -> judge pool (:mod:`.judge`) -> pairs
(:mod:`.pairs`) -> the long-lived reference pool (:mod:`.reference`) -> the long-lived Ray Train
worker group (:mod:`.worker`, fed through the round queue :mod:`.rounds`) -> weights back to the
generators through Ray's object store (:mod:`.weights`). The driver loop is :mod:`.run`.

Kept free of imports here: :mod:`raydpo.config` imports :mod:`.settings`.
"""
