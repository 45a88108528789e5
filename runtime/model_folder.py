"""Find the files of a Wan 2.2 I2V-A14B model: the two experts, the text encoder, its
tokenizer and the VAE, in the folder layouts people download.

Recognised layouts:
- official (`Wan-AI/Wan2.2-I2V-A14B`): high_noise_model/, low_noise_model/ (sharded
  safetensors), models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth, google/umt5-xxl/;
- ComfyUI: diffusion_models/ (or unet/), text_encoders/ (or clip/), vae/ under the folder
  given or its models/ subfolder;
- flat: one folder holding the files, e.g. a pair of GGUF experts, a umt5 file and a VAE.

Files are told apart by name, which is all a folder offers; what each file holds is
checked when it is loaded. The experts' roles come from the name (`...HighNoise...`,
`high_noise`, `_high_`, likewise low) or, for our GGUF files, the `wan.expert` metadata.
Nothing here loads a model.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

HIGH, LOW = "high_noise", "low_noise"

OFFICIAL_HIGH = "high_noise_model"
OFFICIAL_LOW = "low_noise_model"
OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_VAE = "Wan2.1_VAE.pth"
OFFICIAL_TOKENIZER = Path("google") / "umt5-xxl"
# A diffusers pipeline folder (Wan-AI/Wan2.2-I2V-A14B-Diffusers): `transformer` runs the
# high-noise steps, `transformer_2` the low-noise ones.
DIFFUSERS_INDEX = "model_index.json"
DIFFUSERS_DIRS = {"high_noise": "transformer", "low_noise": "transformer_2", "text_encoder": "text_encoder",
                  "tokenizer": "tokenizer", "vae": "vae"}

WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".pth", ".pt", ".ckpt", ".bin")
DIT_SUFFIXES = (".gguf", ".safetensors")
COMFY_DIRS = {
    "experts": ("diffusion_models", "unet"),
    "text_encoder": ("text_encoders", "clip"),
    "vae": ("vae",),
}

# What each component is, for messages that say what was expected where.
EXPECTED = {
    "high_noise": (f"{OFFICIAL_HIGH}/ (official layout), transformer/ (diffusers), or a DiT file named for the high-noise "
                   "expert (…HighNoise….gguf, …high_noise….safetensors, …_high_…) or a GGUF with "
                   "wan.expert = high_noise", "--high-noise"),
    "low_noise": (f"{OFFICIAL_LOW}/ (official layout), transformer_2/ (diffusers), or a DiT file named for the low-noise "
                  "expert (…LowNoise….gguf, …low_noise….safetensors, …_low_…) or a GGUF with "
                  "wan.expert = low_noise", "--low-noise"),
    "text_encoder": (f"{OFFICIAL_T5} (official layout), text_encoder/ (diffusers), "
                     "text_encoders/umt5….safetensors (ComfyUI) or a umt5 ….gguf", "--text-encoder"),
    "tokenizer": (f"{OFFICIAL_TOKENIZER.as_posix()}/ (official layout) or tokenizer/ (diffusers) with "
                  "tokenizer.json or spiece.model; a umt5 GGUF carries its own", "--tokenizer"),
    "vae": (f"{OFFICIAL_VAE} (official layout), vae/diffusion_pytorch_model.safetensors (diffusers) "
            "or vae/wan_2.1_vae.safetensors (ComfyUI)", "--vae"),
}
COMPONENTS = tuple(EXPECTED)


class ModelFilesError(FileNotFoundError):
    """A model file that is missing, ambiguous or not where it was said to be."""


@dataclass(frozen=True)
class ModelFiles:
    high_noise: Path | None = None
    low_noise: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    vae: Path | None = None
    layout: str = "explicit"  # "official", "diffusers", "comfyui", "flat" or "explicit"
    folder: Path | None = None
    notes: tuple[str, ...] = field(default=())

    def missing(self, *components: str) -> list[str]:
        return [c for c in components if getattr(self, c) is None]

    def require(self, *components: str) -> None:
        """Raise ModelFilesError naming every missing component, what was expected where,
        and the flag that gives it."""
        missing = self.missing(*components)
        if not missing:
            return
        where = f"in {self.folder} ({self.layout} layout)" if self.folder else "(no model folder given)"
        lines = [f"{c.replace('_', '-')}: expected {EXPECTED[c][0]}; or pass {EXPECTED[c][1]} PATH"
                 for c in missing]
        raise ModelFilesError(f"missing model files {where}: " + " | ".join(lines))

    def describe(self) -> list[str]:
        return [f"{c.replace('_', ' ')}: {getattr(self, c) or '-'}" for c in COMPONENTS]


# ---- names --------------------------------------------------------------------------


def name_tokens(name: str) -> list[str]:
    """Lower-case words of a file name: CamelCase and separators split ("HighNoise-Q8_0"
    -> high, noise, q8, 0)."""
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return [t for t in re.split(r"[^a-z0-9]+", spaced.lower()) if t]


def _flat(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def expert_role(path: Path) -> str | None:
    """HIGH / LOW from a file or folder name, or None when the name does not say (or says both)."""
    stem = path.name
    for suffix in WEIGHT_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    tokens, flat = name_tokens(stem), _flat(stem)
    high = "highnoise" in flat or "high" in tokens
    low = "lownoise" in flat or "low" in tokens
    if high == low:
        return None
    return HIGH if high else LOW


def gguf_expert(path: Path) -> str | None:
    """The `wan.expert` metadata of a GGUF (our converter writes it), else None."""
    from quant.gguf_reader import GGUFError, GGUFFile

    try:
        with GGUFFile(path, require_data=False) as f:
            value = f.metadata.get("wan.expert")
    except (GGUFError, OSError):
        return None  # unreadable: the loader will say why if this file is chosen
    return value if value in (HIGH, LOW) else None


def _is_other_part(path: Path) -> bool:
    """Files a folder of Wan models holds that are no DiT expert."""
    flat = _flat(path.name)
    return any(w in flat for w in ("vae", "umt5", "t5xxl", "clip", "lora", "tokenizer"))


def _other_task(path: Path) -> bool:
    tokens = name_tokens(path.name)
    return any(t in ("t2v", "ti2v", "5b", "s2v", "animate", "fun", "vace") for t in tokens)


def _is_wan22_vae(path: Path) -> bool:
    return "wan22vae" in _flat(path.name)


# ---- searching ----------------------------------------------------------------------


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _weight_files(folder: Path, depth: int = 1) -> list[Path]:
    """Weight files in `folder` and (depth) its subfolders, hidden ones skipped."""
    out = []
    for p in _entries(folder):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES:
            out.append(p)
        elif p.is_dir() and depth > 0:
            out += _weight_files(p, depth - 1)
    return out


def _expert_dirs(folder: Path) -> list[Path]:
    """Subfolders holding one sharded or diffusers expert, named for its role."""
    return [p for p in _entries(folder) if p.is_dir() and expert_role(p) is not None
            and any(q.suffix == ".safetensors" for q in _entries(p))]


def find_experts(places: list[Path], notes: list[str]) -> tuple[Path | None, Path | None]:
    """The high- and low-noise experts among the files (and expert folders) of `places`."""
    candidates: list[Path] = []
    for place in places:
        candidates += [p for p in _weight_files(place) if p.suffix.lower() in DIT_SUFFIXES
                       and not _is_other_part(p) and p.parent.name not in (OFFICIAL_HIGH, OFFICIAL_LOW)]
        candidates += _expert_dirs(place)
    roles: dict[str, list[Path]] = {HIGH: [], LOW: []}
    for p in candidates:
        role = expert_role(p)
        if role is None and p.suffix.lower() == ".gguf":
            role = gguf_expert(p)
        if role is not None:
            roles[role].append(p)
    found = []
    for role, paths in roles.items():
        this_task = [p for p in paths if not _other_task(p)]
        if this_task and len(this_task) < len(paths):
            skipped = [p.name for p in paths if p not in this_task]
            notes.append(f"skipped {', '.join(skipped)}: named for another Wan model than I2V-A14B")
            paths = this_task
        i2v = [p for p in paths if "i2v" in name_tokens(p.name)]
        if len(paths) > 1 and len(i2v) == 1:
            paths = i2v
        if len(paths) > 1:
            flag = EXPECTED[role][1]
            raise ModelFilesError(
                f"several {role.replace('_', '-')} experts found: {', '.join(str(p) for p in paths)}; "
                f"pass the one to use with {flag}")
        found.append(paths[0] if paths else None)
    return found[0], found[1]


def _prefer(paths: list[Path], what: str, notes: list[str]) -> Path | None:
    """One file among several candidates for a small component, saying which was taken."""
    if not paths:
        return None

    def rank(p: Path) -> tuple:
        tokens = name_tokens(p.name)
        fp8 = any(t.startswith("fp8") or t.startswith("e4m3") for t in tokens)
        kind = {".pth": 0, ".safetensors": 1, ".gguf": 2}.get(p.suffix.lower(), 3)
        return (fp8, kind, p.name)

    chosen = sorted(paths, key=rank)[0]
    if len(paths) > 1:
        others = ", ".join(p.name for p in paths if p != chosen)
        notes.append(f"{what}: using {chosen.name} (also found {others}; pass another explicitly to choose)")
    return chosen


def find_text_encoder(places: list[Path], notes: list[str]) -> Path | None:
    files = [p for place in places for p in _weight_files(place)
             if "umt5" in _flat(p.name) and "lora" not in _flat(p.name)]
    return _prefer(files, "text encoder", notes)


def find_vae(places: list[Path], notes: list[str]) -> Path | None:
    files = [p for place in places for p in _weight_files(place) if "vae" in _flat(p.name)]
    usable = [p for p in files if not _is_wan22_vae(p)]
    if files and not usable:
        raise ModelFilesError(
            f"found only {', '.join(str(p) for p in files)}: the Wan 2.2 VAE of TI2V-5B; I2V-A14B "
            f"uses the Wan 2.1 VAE ({OFFICIAL_VAE} or ComfyUI's wan_2.1_vae.safetensors); pass it with --vae")
    return _prefer(usable, "VAE", notes)


def _tokenizer_dir(folder: Path) -> Path | None:
    for cand in (folder / OFFICIAL_TOKENIZER, folder / "tokenizer", folder):
        if (cand / "tokenizer.json").is_file() or (cand / "spiece.model").is_file():
            return cand
    return None


def find_tokenizer(places: list[Path], text_encoder: Path | None) -> Path | None:
    """google/umt5-xxl/ in the model folder or beside the text encoder; a umt5 GGUF
    carries its tokenizer in its metadata."""
    near = list(places)
    if text_encoder is not None:
        near.append(text_encoder if text_encoder.is_dir() else text_encoder.parent)
    for folder in near:
        found = _tokenizer_dir(folder)
        if found is not None:
            return found
    if text_encoder is not None and text_encoder.suffix.lower() == ".gguf":
        return text_encoder
    return None


def find_model_files(folder: str | os.PathLike) -> ModelFiles:
    """The files of the model in `folder`; components not found are None (see `require`)."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise ModelFilesError(f"{root}: no such model folder")
    if not root.is_dir():
        raise ModelFilesError(f"{root}: is a file, not a model folder; pass single files with "
                              "--high-noise/--low-noise/--text-encoder/--vae")
    notes: list[str] = []
    if (root / OFFICIAL_HIGH).is_dir() or (root / OFFICIAL_LOW).is_dir():
        high = root / OFFICIAL_HIGH if (root / OFFICIAL_HIGH).is_dir() else None
        low = root / OFFICIAL_LOW if (root / OFFICIAL_LOW).is_dir() else None
        t5 = root / OFFICIAL_T5 if (root / OFFICIAL_T5).is_file() else find_text_encoder([root], notes)
        vae = root / OFFICIAL_VAE if (root / OFFICIAL_VAE).is_file() else find_vae([root], notes)
        return ModelFiles(high, low, t5, find_tokenizer([root], t5), vae, "official", root, tuple(notes))

    if (root / DIFFUSERS_INDEX).is_file():
        return _diffusers_files(root, notes)

    for base in (root, root / "models"):
        dirs = {k: [base / d for d in names if (base / d).is_dir()] for k, names in COMFY_DIRS.items()}
        if dirs["experts"]:
            high, low = find_experts(dirs["experts"], notes)
            t5 = find_text_encoder(dirs["text_encoder"], notes)
            vae = find_vae(dirs["vae"], notes)
            return ModelFiles(high, low, t5, find_tokenizer([root, base], t5), vae, "comfyui", root, tuple(notes))

    high, low = find_experts([root], notes)
    t5 = find_text_encoder([root], notes)
    vae = find_vae([root], notes)
    return ModelFiles(high, low, t5, find_tokenizer([root], t5), vae, "flat", root, tuple(notes))


def _diffusers_files(root: Path, notes: list[str]) -> ModelFiles:
    """The components of a diffusers pipeline folder, each in its subfolder."""
    found = {c: root / d for c, d in DIFFUSERS_DIRS.items() if (root / d).is_dir()}
    vae = None
    if "vae" in found:
        vae = _prefer([p for p in _weight_files(found["vae"], depth=0) if p.suffix == ".safetensors"], "VAE", notes)
    tokenizer = _tokenizer_dir(found["tokenizer"]) if "tokenizer" in found else None
    return ModelFiles(found.get("high_noise"), found.get("low_noise"), found.get("text_encoder"), tokenizer, vae,
                      "diffusers", root, tuple(notes))


def resolve_model_files(model: str | os.PathLike | None = None, **explicit) -> ModelFiles:
    """Files from a model folder, with any component given explicitly (keywords
    high_noise, low_noise, text_encoder, tokenizer, vae) taking precedence."""
    unknown = set(explicit) - set(COMPONENTS)
    if unknown:
        raise TypeError(f"unknown model components {sorted(unknown)}; expected {', '.join(COMPONENTS)}")
    given = {}
    for name, value in explicit.items():
        if value is None:
            continue
        path = Path(value).expanduser()
        if not path.exists():
            flag = EXPECTED[name][1]
            raise ModelFilesError(f"{flag} {path}: no such file or folder; expected {EXPECTED[name][0]}")
        given[name] = path
    files = find_model_files(model) if model is not None else ModelFiles()
    files = replace(files, **given)
    if "text_encoder" in given and "tokenizer" not in given:
        # A text encoder from elsewhere brings its own tokenizer, if one is beside it.
        files = replace(files, tokenizer=find_tokenizer([], files.text_encoder) or files.tokenizer)
    return files
