"""Loading a base model: architecture detection from the config's ``model_type``, strict weight checks, the embedded
checkpoints, and the scan a model runs.

Every supported checkpoint loads through ``AutoModelForCausalLM``; the one table of architectures
(``trials.models.interface.architectures``, each kind module registering its own) says which transformers class that
is, what family of model it is (``mamba1``, ``mamba2``, or a ``hybrid`` of Mamba-2 mixers with attention and MLP
layers), and where its SSM mixers live. Directories in mamba-ssm's own layout (``config.json`` with ``d_model``,
``n_layer``, ``ssm_cfg``) are converted on load by ``trials.models.mamba_ssm_format``.

Tiny random-init hybrids for tests and examples (there is no hub here):

    python -m trials.models.loading --write-fixture bamba /tmp/tiny-bamba
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trials.models.interface import Architecture, CheckpointError, architectures

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# The pretrained checkpoints shipped with the package, by the name ``model.checkpoint`` takes
# (``trials.pretraining.pretrain.RECIPES`` makes them).
EMBEDDED_CHECKPOINTS = {"embedded-small": ASSETS / "small-mamba", "embedded-tiny": ASSETS / "tiny-mamba",
                        "embedded-mamba2": ASSETS / "tiny-mamba2",
                        # The small architecture over a BPE vocabulary (trials.pretraining.pretrain_bpe), for text.
                        "embedded-small-bpe": ASSETS / "small-mamba-bpe"}
# What ``embedded`` means. The environment variable names another embedded checkpoint instead (the test suite
# sets embedded-tiny, for speed); it is read on every call, so Ray workers started from that environment agree.
EMBEDDED_DEFAULT = "embedded-small"
EMBEDDED_ENV = "MAMBA_PEFT_EMBEDDED"


def embedded_name(name: str = "embedded") -> str:
    """The embedded checkpoint ``name`` stands for (``embedded`` follows MAMBA_PEFT_EMBEDDED when it is set)."""
    if name == "embedded":
        name = os.environ.get(EMBEDDED_ENV) or EMBEDDED_DEFAULT
        where = f"{EMBEDDED_ENV}={name}"
    else:
        where = f"model.checkpoint: {name}"
    if name not in EMBEDDED_CHECKPOINTS:
        raise FileNotFoundError(f"{where}: no such embedded checkpoint (there are: embedded, "
                                f"{', '.join(EMBEDDED_CHECKPOINTS)})")
    return name


def resolve_checkpoint(name: str) -> str:
    """``embedded`` (the small pretrained Mamba) or an ``embedded-*`` name is a checkpoint shipped with the
    package; anything else is a local directory or a Hugging Face model id, loaded through the same
    ``from_pretrained`` path."""
    if name == "embedded" or name in EMBEDDED_CHECKPOINTS:
        return str(EMBEDDED_CHECKPOINTS[embedded_name(name)])
    try:
        path = Path(name).expanduser()
    except RuntimeError as exc:  # ~user of no such user
        raise FileNotFoundError(f"model.checkpoint: {name!r}: {exc}") from exc
    # Written as a path (a hub id is never absolute, and never starts with ./, ../ or ~): say so, rather than pass it
    # to the hub, which answers with the rules of repo ids.
    if path.is_absolute() or name.startswith((".", "~")):
        if not path.exists():
            raise FileNotFoundError(f"model.checkpoint: {name!r}: no such directory ({path.resolve()}); give a "
                                    f"checkpoint directory, an embedded name "
                                    f"({', '.join(['embedded', *EMBEDDED_CHECKPOINTS])}) or a Hugging Face model id")
        return str(path) if name.startswith("~") else name  # ~ expanded: from_pretrained would take it for a repo id
    return name


def architecture(config: Any, checkpoint: str = "the checkpoint") -> str:
    """The config's ``model_type`` once it is known to be supported; otherwise a ``CheckpointError`` naming the
    model_type and architectures found and the ones supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in architectures():
        found = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        supported = ", ".join(f"{a.model_class} (model_type {t!r})" for t, a in architectures().items())
        raise CheckpointError(f"model.checkpoint: {checkpoint!r} is a {model_type!r} model ({found}); supported: "
                              f"{supported}")
    return str(model_type)


def check_architecture(config: Any, checkpoint: str) -> None:
    """Refuse a config whose ``model_type`` is not supported (``architecture`` without the answer)."""
    architecture(config, checkpoint)


def arch_of(lm: Any) -> Architecture:
    """The table row of a loaded model."""
    return architectures()[architecture(lm.config)]


def ssm_mixers(lm: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every SSM mixer of ``lm``, in layer order: the modules at the table's path whose class
    is (or derives from) its mixer class, so attention layers at the same path and a project subclass installed
    in place of transformers' mixer are told apart correctly."""
    arch = arch_of(lm)
    pattern = re.compile(re.escape(arch.mixers).replace(re.escape("{i}"), r"\d+") + "$")
    for name, module in lm.named_modules():
        if pattern.match(name) and any(c.__name__ == arch.mixer_class for c in type(module).__mro__):
            yield name, module


def _weight_name(key: Any) -> str:
    """A key of transformers' loading info: a name, or (name, checkpoint shape, model shape) for a mismatch."""
    if isinstance(key, tuple) and len(key) == 3:
        return f"{key[0]} (checkpoint {list(key[1])}, model {list(key[2])})"
    return str(key)


def check_loading_info(info: dict[str, Any], checkpoint: str, path: str, model: Any) -> None:
    """Refuse any missing, unexpected or mismatched weight transformers reports, naming them (it would only log
    them and initialise the missing ones)."""
    problems = {kind: sorted(_weight_name(k) for k in info.get(f"{kind}_keys") or ())
                for kind in ("missing", "unexpected", "mismatched")}
    if any(problems.values()):
        said = "; ".join(f"{len(keys)} {kind} weight(s): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                         for kind, keys in problems.items() if keys)
        raise CheckpointError(f"model.checkpoint: {checkpoint!r} ({path}) does not fit {type(model).__name__}: "
                              f"{said}. Nothing was initialised in their place.")


# The dtype every base model's weights are held in: trials keep fp32 master weights and run bf16 / fp16 through
# autocast (training.precision), so a checkpoint saved in bf16 (transformers would load it as bf16, its dtype="auto")
# neither trains in bf16 under precision fp32 nor rounds its adapters' deltas to bf16.
LOAD_DTYPE = torch.float32


def load_base_model(checkpoint: str, scan: str = "auto") -> Any:
    """Load a supported causal LM checkpoint and set its scan.

    ``checkpoint`` is an embedded name, a directory (transformers' layout, or mamba-ssm's, converted in memory)
    or a model id. The weights load in fp32 whatever dtype the checkpoint was saved in (``LOAD_DTYPE``). Nothing is
    initialised silently: another architecture, or any weight the checkpoint lacks, has
    in excess or holds in another shape, is a ``CheckpointError`` that names them.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from trials.models import mamba_ssm_format

    path = resolve_checkpoint(checkpoint)
    try:
        if mamba_ssm_format.is_mamba_ssm(path):
            config, state_dict = mamba_ssm_format.convert(path)
            cls = getattr(transformers, architectures()[architecture(config, checkpoint)].model_class)
            # Mismatched shapes are reported in `info` (and refused below) rather than raised without their names.
            model, info = cls.from_pretrained(None, config=config, state_dict=state_dict, output_loading_info=True,
                                              ignore_mismatched_sizes=True, dtype=LOAD_DTYPE)
        else:
            config = AutoConfig.from_pretrained(path)
            architecture(config, checkpoint)
            model, info = AutoModelForCausalLM.from_pretrained(  # type: ignore[misc]
                path, config=config, output_loading_info=True, ignore_mismatched_sizes=True, dtype=LOAD_DTYPE)
    except OSError as exc:
        raise FileNotFoundError(f"model.checkpoint: cannot load {checkpoint!r} ({path}): {exc}") from exc
    check_loading_info(info, checkpoint, path, model)
    return use_scan(model, scan)


def random_base_model(checkpoint: str, scan: str = "auto") -> Any:
    """The checkpoint's architecture (its config only, no weights) with transformers' initialisation, from the
    global RNG (a ``scratch`` baseline)."""
    import transformers
    from transformers import AutoConfig

    path = resolve_checkpoint(checkpoint)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise FileNotFoundError(f"model.checkpoint: cannot load {checkpoint!r} ({path}): {exc}") from exc
    cls = getattr(transformers, architectures()[architecture(config, checkpoint)].model_class)
    return use_scan(cls(config).to(LOAD_DTYPE), scan)


def quiet_transformers() -> None:
    """transformers' and datasets' progress bars and warnings off: they would interleave with a search's lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from datasets.utils.logging import disable_progress_bar as quiet_datasets

        quiet_datasets()  # "Generating train split" bars would interleave with the search's lines
    except ImportError:
        pass


SCANS = ("auto", "compiled", "torch", "mambapy", "hf_loop")


def use_scan(lm: Any, scan: str) -> Any:
    """Choose the mixer forward. On Mamba-1, ``auto``, ``compiled`` and ``torch`` install the project's mixer
    (``trials.models.mamba1_mixer``); ``mambapy`` and ``hf_loop`` keep transformers' own paths (``use_mambapy=True``
    / the default loop). On Mamba-2 and the hybrids whose mixer ``trials.models.mamba2_mixer`` covers, the first three
    install the project's Mamba-2 mixer with that convolution; ``mambapy`` and ``hf_loop`` (and a mixer it does not
    cover, such as FalconH1's) keep transformers' chunked-SSD path.
    """
    if scan not in SCANS:
        raise ValueError(f"model.scan: {scan!r} is not one of {', '.join(SCANS)}")
    arch = arch_of(lm)
    fast = scan in ("auto", "compiled", "torch")
    if arch.family == "mamba1":
        from trials.models.mamba1_mixer import install_fast_mixer, install_transformers_mixer

        if fast:
            install_fast_mixer(lm, scan)  # type: ignore[arg-type]
        else:
            install_transformers_mixer(lm, scan)
    elif fast:
        install, covered = _mamba2_installer()
        if install is not None and arch.mixer_class in covered:
            install(lm, scan)
    return lm


def _mamba2_installer() -> tuple[Any, set[str]]:
    """The project's Mamba-2 mixer installer and the names of the transformers mixer classes it covers; (None, {})
    where ``trials.models.mamba2_mixer`` cannot be imported, so that transformers' path is kept."""
    try:
        from trials.models.mamba2_mixer import FAST_CLASSES, install_fast_mamba2_mixer
    except ImportError:
        return None, set()
    return install_fast_mamba2_mixer, {cls.__name__ for cls in FAST_CLASSES}


def main(argv: list[str] | None = None) -> None:
    from trials.models.fixtures import FIXTURES, write_fixture

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write-fixture", nargs=2, metavar=("MODEL_TYPE", "DIR"), required=True,
                   help=f"write a tiny random-init checkpoint of one of: {', '.join(FIXTURES)}")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    model_type, out = a.write_fixture
    path = write_fixture(model_type, Path(out), seed=a.seed)
    print(f"wrote a tiny random {model_type} to {path}; use it as model.checkpoint: {path}")


if __name__ == "__main__":
    main()
