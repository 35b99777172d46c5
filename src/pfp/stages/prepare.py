"""Stage ``prepare``: IDX files -> Dirty-MNIST splits + manifest in ``data/prepared``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pfp.config import PipelineParams
from pfp.data.dirty_mnist import prepare_dirty_mnist, save_prepared
from pfp.stage import PREPARED_DIR


@dataclass(frozen=True)
class PrepareResult:
    """What the stage wrote: the prepared folder and its manifest (counts, seeds, hashes)."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    @property
    def data_hash(self) -> str:
        return self.manifest["data_hash"]

    def metrics(self) -> dict[str, Any]:
        return {"count": self.manifest["counts"],
                "ambiguous_acceptance_rate": self.manifest["ambiguous"].get("acceptance_rate", 1.0)}


def prepare(params: PipelineParams, *, root: Path = Path("."), progress: bool = True) -> PrepareResult:
    """Read and validate the IDX files named by ``params.data``, split them, build Ambiguous-MNIST
    (``params.ambiguous``, seeded by ``params.seed``) and write ``root/data/prepared``.

    Parameters
    ----------
    params
        The pipeline parameters (``seed``, ``data`` and ``ambiguous`` are read).
    root
        The workspace folder.
    progress
        Show progress bars.

    Returns
    -------
    PrepareResult
        The folder written and the manifest.
    """
    arrays, manifest = prepare_dirty_mnist(params, progress=progress)
    folder = Path(root) / PREPARED_DIR
    save_prepared(folder, arrays, manifest)
    return PrepareResult(folder=folder, manifest=manifest)
