"""Model families: the one place where a family's attention, position or masking code needs raydpo
to act (:mod:`.rules`). Their tiny in-process builds are fixtures (:mod:`raydpo.fixtures.families`)."""
