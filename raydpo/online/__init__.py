"""Online / iterative DPO as one Ray pipeline (``raydpo online``).

Each round: prompts (:mod:`.prompts`) -> generator pool (:mod:`.generate`) -> judge pool
(:mod:`.judge`) -> pairs (:mod:`.pairs`) -> the long-lived reference pool (:mod:`.reference`) -> the
long-lived Ray Train worker group (:mod:`.worker`, the shared trainer driven round by round, fed
through the round queue :mod:`.rounds`) -> weights back to the generators through Ray's object
store (:mod:`raydpo.train.weights`; the pool that replaces dead actors: :mod:`.pool`). One round's
phases and its row: :mod:`.phases`; the run's driver: :mod:`.driver`, started by :mod:`.run`; how
the held-out reward goes and which weights to keep: :mod:`.progress`, :mod:`.keep`.
"""
