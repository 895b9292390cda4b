"""Base models: loading and architecture detection, one module per mixer kind behind one typed interface, and the
scan kernels they use (see ../shared/STYLE.md, "The house as it grows")."""
