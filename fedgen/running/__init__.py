"""The commands' machinery: `simulate` (`fedgen simulate`, Flower's simulation engine), `sweep`
(`fedgen sweep`), `invert` (`fedgen invert`: the curious coordinator's gradient inversion of an
update it recorded), `deploy` (Flower's deployment engine across machines) and `deploy_commands`
(`fedgen deploy`), `loopback` (a whole TLS federation on one machine), `processes` (starting
Flower's processes and stopping every one) and `certificates` (test certificates and node keys).
Flower runs in the processes they start; they never import `flwr`.

May import every layer below it and `attacks` (a sweep attacks each run); only `fedgen.cli` imports
it (`tests/test_layering.py` keeps it so).
"""
