"""`rlae-compare`: every baseline of the field and the learned agents on the same documents, through
the harness, with accuracy, paired differences and cost (see `command`)."""
