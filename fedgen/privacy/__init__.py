"""Differential privacy for one hospital's training; Opacus sits behind these modules.
`accounting` (the training plan, noise calibrated over the whole planned federation, the epsilon
ledger), `randomness` (the secret Gaussian noise and Poisson sampling, from the operating system's
CSPRNG), `per_sample_grads` (exact per-example gradients of the denoising loss), `dp_sgd` (local
training, DP-SGD or plain), and the white-box audit of that DP-SGD: `gradient_canaries` (Dirac
gradient rows injected into a step) and `dp_audit` (one audited run, a lower bound on epsilon).
`hospital_level` is the coordinator's own mechanism (DP-FedAvg: Poisson sampling of hospitals,
clipped updates, noise on the sum) with its ledger, a second guarantee beside the hospitals'.
`private_selection` adapts the public base by the hospitals' noisy votes over its samples instead
of DP-SGD (one Gaussian release per hospital; benchmarked, not yet a command).

May import the layers below it: `fedgen.seeding`, `fedgen.config`, `fedgen.model`,
`fedgen.diffusion`, `fedgen.run_dir` and `fedgen.data`. It knows nothing of tracking, the
federation, evaluation, attacks or the commands (`tests/test_layering.py` keeps it so).
"""
