"""model.model_card_data: what sentence-transformers' evaluators write into.

sentence-transformers' evaluators end by calling
``model.model_card_data.set_evaluation_metrics(evaluator, metrics, epoch, step)``;
this keeps those metrics (and a few facts about the model) in memory, with no
dependency on sentence-transformers or huggingface_hub.
"""
from dataclasses import dataclass, field


@dataclass
class ModelCardData:
    """Facts about a DeeLM and the metrics evaluators reported on it."""

    model_name: str = None
    base_model: str = None
    language: list = field(default_factory=lambda: ["en"])
    license: str = None
    tags: list = field(default_factory=lambda: ["sentence-transformers", "sentence-similarity",
                                                "feature-extraction", "deelm"])
    # one dict per call of set_evaluation_metrics: evaluator, metrics, epoch, step
    eval_results: list = field(default_factory=list)

    def set_evaluation_metrics(self, evaluator, metrics, epoch=0, step=0):
        self.eval_results.append({
            "evaluator": type(evaluator).__name__,
            "name": getattr(evaluator, "name", "") or "",
            "primary_metric": getattr(evaluator, "primary_metric", None),
            "metrics": dict(metrics), "epoch": epoch, "step": step,
        })

    def to_dict(self):
        return {"model_name": self.model_name, "base_model": self.base_model,
                "language": list(self.language), "license": self.license,
                "tags": list(self.tags), "eval_results": list(self.eval_results)}
