"""The demo: synthetic long-range recall (:mod:`.recall`), training (:mod:`.train`), the run (:mod:`.run`)."""
