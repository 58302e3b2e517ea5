"""Publishing: Hub-ready exports, generated model cards, and push to the Hugging Face Hub."""
from .export import check_export, export, load_exported

__all__ = ["check_export", "export", "load_exported"]
