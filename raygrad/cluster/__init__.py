"""Ray: starting or joining it, the worker actors' lifecycle, the elastic scheduler, the reaper."""
