"""Loading a base model: architecture detection from the config's ``model_type``, strict weight checks, and the
table of what the project fine-tunes.

Every supported checkpoint loads through ``AutoModelForCausalLM``; the table says which transformers class that
is, what kind of model it is (``mamba1``, ``mamba2``, or a ``hybrid`` of Mamba-2 mixers with attention and MLP
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

Kind = Literal["mamba1", "mamba2", "hybrid"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# The pretrained checkpoints shipped with the package, by the name ``model.checkpoint`` takes
# (``trials.pretrain.RECIPES`` makes them).
EMBEDDED_CHECKPOINTS = {"embedded-small": ASSETS / "small-mamba", "embedded-tiny": ASSETS / "tiny-mamba",
                        "embedded-mamba2": ASSETS / "tiny-mamba2",
                        # The small architecture over a BPE vocabulary (trials.pretrain_bpe), for text tasks.
                        "embedded-small-bpe": ASSETS / "small-mamba-bpe"}
# What ``embedded`` means. The environment variable names another embedded checkpoint instead (the test suite
# sets embedded-tiny, for speed); it is read on every call, so Ray workers started from that environment agree.
EMBEDDED_DEFAULT = "embedded-small"
EMBEDDED_ENV = "MAMBA_PEFT_EMBEDDED"


@dataclass(frozen=True)
class Architecture:
    """One supported ``model_type``.

    ``mixers`` is where the SSM mixers live, ``{i}`` standing for the layer index; in a hybrid only some layers
    have one, and ``mixer_class`` tells them from attention layers that share the path (NemotronH's ``mixer``).
    ``embeds_scaled_by`` names a config multiplier the base model applies to embeddings it looks up itself but
    not to ``inputs_embeds`` (FalconH1's muP scaling), so a caller handing in embeddings applies it.
    ``logits_multiplier`` / ``logits_divisor`` name the config scale the causal LM applies after ``lm_head``.
    """

    model_type: str
    model_class: str
    kind: Kind
    mixers: str
    mixer_class: str
    embeds_scaled_by: str | None = None
    logits_multiplier: str | None = None
    logits_divisor: str | None = None

    def input_scale(self, config: Any) -> float:
        return float(getattr(config, self.embeds_scaled_by)) if self.embeds_scaled_by else 1.0

    def output_scale(self, config: Any) -> float:
        scale = float(getattr(config, self.logits_multiplier)) if self.logits_multiplier else 1.0
        return scale / float(getattr(config, self.logits_divisor)) if self.logits_divisor else scale


# The architectures a trial can fine-tune, by the config's ``model_type``. Each was checked on CPU with a tiny
# random config (transformers 5.24): it builds, runs forward and backward, and save_pretrained/from_pretrained
# gives back the same logits. Zamba2 (mixers at two depths, shared attention blocks with adapters of their own) and
# Jamba (Mamba-1 mixers inside a MoE hybrid) also pass those checks but are left out until the method library
# maps them.
ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("mamba", "MambaForCausalLM", "mamba1", "backbone.layers.{i}.mixer", "MambaMixer"),
    Architecture("mamba2", "Mamba2ForCausalLM", "mamba2", "backbone.layers.{i}.mixer", "Mamba2Mixer"),
    Architecture("bamba", "BambaForCausalLM", "hybrid", "model.layers.{i}.mamba", "BambaMixer"),
    Architecture("granitemoehybrid", "GraniteMoeHybridForCausalLM", "hybrid", "model.layers.{i}.mamba",
                 "GraniteMoeHybridMambaLayer", logits_divisor="logits_scaling"),
    Architecture("falcon_h1", "FalconH1ForCausalLM", "hybrid", "model.layers.{i}.mamba", "FalconH1Mixer",
                 embeds_scaled_by="embedding_multiplier", logits_multiplier="lm_head_multiplier"),
    Architecture("nemotron_h", "NemotronHForCausalLM", "hybrid", "model.layers.{i}.mixer", "NemotronHMamba2Mixer"),
)}
# The same, as the transformers class each loads as (kept for callers of the Mamba-1-only table).
SUPPORTED_ARCHITECTURES = {t: a.model_class for t, a in ARCHITECTURES.items()}


class CheckpointError(ValueError):
    """A checkpoint the project cannot fine-tune as it is: another architecture, or weights that do not fit."""


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
    if model_type not in ARCHITECTURES:
        found = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        supported = ", ".join(f"{a.model_class} (model_type {t!r})" for t, a in ARCHITECTURES.items())
        raise CheckpointError(f"model.checkpoint: {checkpoint!r} is a {model_type!r} model ({found}); supported: "
                              f"{supported}")
    return str(model_type)


def check_architecture(config: Any, checkpoint: str) -> None:
    """Refuse a config whose ``model_type`` is not supported (``architecture`` without the answer)."""
    architecture(config, checkpoint)


def arch_of(lm: Any) -> Architecture:
    """The table row of a loaded model."""
    return ARCHITECTURES[architecture(lm.config)]


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


def load_base_model(checkpoint: str, scan: str = "auto") -> Any:
    """Load a supported causal LM checkpoint and set its scan.

    ``checkpoint`` is an embedded name, a directory (transformers' layout, or mamba-ssm's, converted in memory)
    or a model id. Nothing is initialised silently: another architecture, or any weight the checkpoint lacks, has
    in excess or holds in another shape, is a ``CheckpointError`` that names them.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from trials.models import mamba_ssm_format

    path = resolve_checkpoint(checkpoint)
    try:
        if mamba_ssm_format.is_mamba_ssm(path):
            config, state_dict = mamba_ssm_format.convert(path)
            cls = getattr(transformers, ARCHITECTURES[architecture(config, checkpoint)].model_class)
            # Mismatched shapes are reported in `info` (and refused below) rather than raised without their names.
            model, info = cls.from_pretrained(None, config=config, state_dict=state_dict, output_loading_info=True,
                                              ignore_mismatched_sizes=True)
        else:
            config = AutoConfig.from_pretrained(path)
            architecture(config, checkpoint)
            model, info = AutoModelForCausalLM.from_pretrained(  # type: ignore[misc]
                path, config=config, output_loading_info=True, ignore_mismatched_sizes=True)
    except OSError as exc:
        raise FileNotFoundError(f"model.checkpoint: cannot load {checkpoint!r} ({path}): {exc}") from exc
    check_loading_info(info, checkpoint, path, model)
    return use_scan(model, scan)


SCANS = ("auto", "compiled", "torch", "mambapy", "hf_loop")


def use_scan(lm: Any, scan: str) -> Any:
    """Choose the mixer forward. On Mamba-1, ``auto``, ``compiled`` and ``torch`` install the project's mixer
    (``trials.mixer``); ``mambapy`` and ``hf_loop`` keep transformers' own paths (``use_mambapy=True`` / the default
    loop). On Mamba-2 and the hybrids whose mixer ``trials.models.mamba2_mixer`` covers, the first three install the
    project's Mamba-2 mixer with that convolution; ``mambapy`` and ``hf_loop`` (and a mixer it does not cover, such as
    FalconH1's) keep transformers' chunked-SSD path.
    """
    if scan not in SCANS:
        raise ValueError(f"model.scan: {scan!r} is not one of {', '.join(SCANS)}")
    arch = arch_of(lm)
    fast = scan in ("auto", "compiled", "torch")
    if arch.kind == "mamba1":
        from transformers.models.mamba.modeling_mamba import MambaMixer

        from trials.mixer import install_fast_mixer

        if fast:
            install_fast_mixer(lm, scan)  # type: ignore[arg-type]
        else:
            for module in lm.modules():
                if isinstance(module, MambaMixer):
                    module.use_mambapy = scan == "mambapy"
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
