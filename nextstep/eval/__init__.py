"""Evaluation: the shapes-world checker (`nextstep.eval.shapes`)."""

from .shapes import CheckResult, Detection, check, check_edit, detect

__all__ = ["CheckResult", "Detection", "check", "check_edit", "detect"]
