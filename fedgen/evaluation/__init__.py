"""What a run produced, measured and written up: `utility` (a released model's images against
images it never saw, `utility.json`) with `features`, `fidelity` and `downstream`; `comparison`
(runs side by side: one row per run, TensorBoard HParams, the trade-off figure), `markdown` (how
numbers and tables are written), `report` (a run's privacy report), `sweep_report` (a sweep's) and
`card_check` (a run's privacy card checked against itself and its budget).

May import every layer below it, the federation included (a run's hospitals give the images to
compare against). Never attacks or the commands, `fedgen.running` and `fedgen.cli`
(`tests/test_layering.py` keeps it so).
"""
