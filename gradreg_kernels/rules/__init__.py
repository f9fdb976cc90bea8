"""Layer rules: each layer kind's part in the four passes, in one place per kind."""
