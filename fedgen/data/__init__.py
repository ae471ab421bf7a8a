"""Images and hospital silos: `dataset` (the `ImageSet` every loader returns), `synthetic`
(synthetic chest X-rays), `loaders` (MedMNIST files, image folders, DICOM), `partition` (pooled
images into hospitals, patient by patient), `silos` (each hospital's images split by patient into
training, held-out and validation) and `images` (PNG grids).

May import `fedgen.seeding`, `fedgen.config` and its own layer (`fedgen.model`,
`fedgen.diffusion`, `fedgen.run_dir`); it knows nothing of privacy, tracking, the federation,
evaluation, attacks or the commands (`tests/test_layering.py` keeps it so).
"""
