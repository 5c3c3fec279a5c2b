"""pyinfra facts and operations that the deploys in `deploys/` import."""
