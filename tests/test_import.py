import subprocess
import sys

CODE = """
import sys
import scinfl
print(sorted(m for m in sys.modules if m.startswith("scinfl.privacy")))
print(callable(scinfl.privacy.audit), "privacy" in dir(scinfl))
from scinfl.privacy import audit
print(audit is scinfl.privacy.audit)
"""


def test_import_leaves_out_the_privacy_toolkit_until_first_use():
    # a fresh interpreter: this one may have imported scinfl.privacy already
    result = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, check=True, timeout=300
    )
    loaded, on_use, same = result.stdout.strip().splitlines()
    assert loaded == "[]"
    assert on_use == "True True"
    assert same == "True"
