"""qtb_pipe."""
