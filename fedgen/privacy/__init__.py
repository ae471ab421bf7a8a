"""Differential privacy for one hospital's training; Opacus sits behind these modules.
`accounting` (the training plan, noise calibrated over the whole planned federation, the epsilon
ledger), `randomness` (the secret Gaussian noise and Poisson sampling, from the operating system's
CSPRNG), `per_sample_grads` (exact per-example gradients of the denoising loss) and `dp_sgd` (local
training, DP-SGD or plain).

May import the layers below it: `fedgen.seeding`, `fedgen.config`, `fedgen.model`,
`fedgen.diffusion`, `fedgen.run_dir` and `fedgen.data`. It knows nothing of tracking, the
federation, evaluation, attacks or the commands (`tests/test_layering.py` keeps it so).
"""
