"""Models and SAEs: loading at a pinned revision, families and hook sites, hub access, pins, memory estimates."""
