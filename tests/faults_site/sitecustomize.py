"""Arms tests/kill_at.py inside a stage command that ``dvc repro`` runs (tests/test_faults.py).

With ``SAELAB_KILL_AT="<stage script>|<module>:<function>|<n>|before|after"`` in the environment
and this directory on ``PYTHONPATH``, the Python process whose script ends with ``<stage
script>`` (e.g. ``stages/train.py``) SIGKILLs its whole process group, ``dvc repro`` included,
at the n-th call of that function: as ``kill -9`` of the job, or the OOM killer of a container,
stops both. Every other Python process (DVC itself, other stages) is left alone.
"""

import os
import sys

_spec = os.environ.get("SAELAB_KILL_AT")
if _spec:
    _script, _target, _nth, _when = _spec.split("|")
    if sys.argv and sys.argv[0].replace(os.sep, "/").endswith(_script):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import kill_at

        kill_at.arm(_target, int(_nth), _when, group=True)
