"""Pure decision logic: routing policies, engine-level scheduling policies, migration planning.

Nothing in this package performs I/O, so the live router, the live emulator and the discrete-event
simulator all run exactly the same code.
"""
