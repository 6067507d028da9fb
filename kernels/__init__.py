"""GPU kernels of sv-deploy, installed as `sv_deploy.kernels` (see pyproject.toml)."""
