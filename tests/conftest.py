"""The run's header names the transformers it imports (`make test-floor` runs the suite
on a second version)."""
import os

import transformers


def pytest_report_header(config):
    return f"transformers {transformers.__version__} ({os.path.dirname(transformers.__file__)})"
