"""A pickle that runs code when unpickled, for the tests that memscan never unpickles one."""


class Payload:
    """Unpickling this runs code (writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class SystemCall:
    """Unpickling this would call ``os.system`` (a builtin module's global, which torch's
    weights-only unpickler refuses with another wording than other globals)."""

    def __reduce__(self):
        import os

        return (os.system, ("true",))
