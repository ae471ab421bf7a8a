"""The federation without Flower: `hospital` (a hospital's silo, ledger, local training and
evaluation), `site` (where a deployed hospital's images and records live), `coordinator` (the
global model, history, checkpoints, the released pipeline, resuming) and `update_checks` (checks
of a hospital's update before it is aggregated). `clients/` and `server/` wrap them in Flower.

May import every layer below it: `fedgen.seeding`, `fedgen.config`, `fedgen.model`,
`fedgen.diffusion`, `fedgen.run_dir`, `fedgen.data`, `fedgen.privacy` and `fedgen.tracking`.
Never evaluation, attacks, the commands or `flwr` (`tests/test_layering.py` keeps it so).
"""
