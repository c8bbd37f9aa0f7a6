"""The service tests use the model folders of the prediction tests (tests/predict/conftest.py)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

_spec = importlib.util.spec_from_file_location("predict_fixtures", pathlib.Path(__file__).parents[1] / "predict" / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _fixtures
_spec.loader.exec_module(_fixtures)

sst2_model = _fixtures.sst2_model
qa_model = _fixtures.qa_model
ner_model = _fixtures.ner_model
multilabel_model = _fixtures.multilabel_model
