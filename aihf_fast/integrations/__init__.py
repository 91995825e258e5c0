"""Integrations with other training libraries (imported on demand: ``aihf_fast.integrations.trl``)."""
