"""bertray: BERT pretraining and fine-tuning as a streaming dataflow on Ray.

Model classes are imported lazily so that Ray Data workers, which only need the pure data
transforms, do not pay for importing torch.
"""

from bertray.model.config import BertConfig
from bertray.errors import BertrayError, CheckpointError, ConfigError, CorpusError, TaskDataError

_LAZY = {
    "BertModel": "bertray.model.bert",
    "BertForPreTraining": "bertray.model.heads",
    "BertForSequenceClassification": "bertray.model.heads",
    "BertForTokenClassification": "bertray.model.heads",
    "BertForQuestionAnswering": "bertray.model.heads",
    "BertForMultipleChoice": "bertray.model.heads",
    "BertFeatureBasedTagger": "bertray.model.heads",
}

__all__ = ["BertConfig", "BertrayError", "CheckpointError", "ConfigError", "CorpusError",
           "TaskDataError", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bertray' has no attribute {name!r}")
