"""Property-based and stateful fuzzing of pfnbd (hypothesis).  Also home to the raw NBD
client (`nbdwire`) and the terminal report helper (`reporting`) that tests/test_hostile.py
shares, and to the in-process server harness (`inprocess`)."""
