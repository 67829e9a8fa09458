"""Plain PyTorch reference implementation of the Pixtral family: the oracle for every fast path."""
