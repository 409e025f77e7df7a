"""Model families: tiny in-process builds of each architecture users train (:mod:`.tiny`) and the
one place where a family's attention, position or masking code needs raydpo to act (:mod:`.rules`)."""
