"""QuantConfig: every choice the user makes, frozen and hashable, round-tripping JSON and URLs."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace

from qcore.data import MAX_SEED, TRAIN_SIZE
from qcore.files import read_json, shorten
from qcore.models.net import LAYER_NAMES
from qcore.quantize.calibrate import OBSERVERS
from qcore.quantize.methods import METHODS, ROUNDING_METHODS
from qcore.quantize.quant import MAX_BITS, MIN_BITS, Granularity, Scheme

WEIGHT_RANGES = ("minmax", "mse")
MAX_QUERY_VALUE = 200  # longer URL values are ignored unread: no setting needs more
MAX_CONFIG_CHARS = 4000  # a config's JSON is about 300 characters; a file's may not be much longer
MAX_BATCH_SIZE = 1024  # the sidebar's largest calibration batch, for the CLI and files too


@dataclass(frozen=True)
class Offered:
    """What the dashboard's sidebar offers. A URL is bounded by the same choices, so a shared link
    can never ask the server for more work than a click could."""

    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 16)
    batch_sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    max_calib_images: int = 4096  # 4x the default; the CLI may use the whole training split

    def max_calib_batches(self, batch_size: int) -> int:
        return max(1, min(max_calib_batches(batch_size), self.max_calib_images // batch_size))


DASHBOARD = Offered()


class ConfigError(ValueError):
    """A QuantConfig value out of range; `problems` lists each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class QuantConfig:
    """Post-training quantization settings. The defaults are the best this project knows:
    per-channel symmetric weights, MSE-clipped activations, every layer (input included) quantized,
    bias as int32 at s_in * s_w."""

    weight_bits: int = 8
    act_bits: int = 8
    calib_batches: int = 16
    batch_size: int = 64
    observer: str = "mse"
    granularity: str = Granularity.PER_CHANNEL.value
    scheme: str = Scheme.SYMMETRIC.value  # the weights' scheme; activations are always affine
    weight_range: str = "mse"  # "minmax" or "mse": how each weight tensor (or channel) is clipped
    quantize_input: bool = True
    float_layers: tuple[str, ...] = ()
    seed: int = 0
    methods: tuple[str, ...] = ()  # any of METHODS, always applied in METHODS' order
    weight_bits_budget: float = 0.0  # > 0: mixed precision, average weight bits at most this
    # > 0: the network's first and last layers (weights and inputs) at this many bits, whatever the
    # rest: LSQ (Esser et al. 2019) and most low-bit QAT work keep them at 8 bits
    edge_bits: int = 0
    # > 0: the tensors that are no layer's input (a residual add's inputs, a concatenation) at this many
    # bits: they feed no multiplication, and LSQ-style QAT quantizes only conv and linear inputs
    add_bits: int = 0

    def __post_init__(self) -> None:
        # Normalize order (network order, unknown names last for problems() to report) so equal
        # choices hash equally whatever order they were given in.
        def rank(name: str) -> tuple[int, str]:
            return (LAYER_NAMES.index(name) if name in LAYER_NAMES else len(LAYER_NAMES), name)

        object.__setattr__(self, "float_layers", tuple(sorted(set(self.float_layers), key=rank)))

        def method_rank(name: str) -> tuple[int, str]:
            return (METHODS.index(name) if name in METHODS else len(METHODS), name)

        object.__setattr__(self, "methods", tuple(sorted(set(self.methods), key=method_rank)))

    def problems(self, layers: Sequence[str] | None = LAYER_NAMES) -> list[str]:
        """Every setting out of range, one line each; float_layers must name `layers` (the model's
        graph layers; the bundled net's by default; None: not checked here, because the model is not
        known yet; quantizing checks them against its graph)."""
        typed = _type_problems({f.name: getattr(self, f.name) for f in fields(self)})
        if typed:
            return typed  # the range checks below compare values, which needs the right types
        found = []
        for name in ("weight_bits", "act_bits"):
            value = getattr(self, name)
            if not MIN_BITS <= value <= MAX_BITS:
                found.append(f"{name} must be between {MIN_BITS} and {MAX_BITS} (got {value})")
        if not 0 <= self.seed <= MAX_SEED:
            found.append(f"seed must be between 0 and {MAX_SEED} (got {self.seed})")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            found.append(f"batch_size must be between 1 and {MAX_BATCH_SIZE} (got {self.batch_size})")
        if self.calib_batches < 1:
            found.append(f"calib_batches must be >= 1 (got {self.calib_batches})")
        elif self.batch_size >= 1 and self.calib_batches > max_calib_batches(self.batch_size):
            found.append(
                f"calib_batches must be <= {max_calib_batches(self.batch_size)} at batch size "
                f"{self.batch_size} (the training split has {TRAIN_SIZE} images; got {self.calib_batches})"
            )
        if self.observer not in OBSERVERS:
            found.append(f"observer must be one of {', '.join(OBSERVERS)} (got {self.observer!r})")
        if self.granularity not in {g.value for g in Granularity}:
            found.append(f"granularity must be per-tensor or per-channel (got {self.granularity!r})")
        if self.weight_range not in WEIGHT_RANGES:
            found.append(f"weight_range must be one of {', '.join(WEIGHT_RANGES)} (got {self.weight_range!r})")
        if self.scheme not in {s.value for s in Scheme}:
            found.append(f"scheme must be asymmetric or symmetric (got {self.scheme!r})")
        unknown_methods = [name for name in self.methods if name not in METHODS]
        if unknown_methods:
            found.append(f"methods: unknown {', '.join(unknown_methods)}; choose from {', '.join(METHODS)}")
        if all(name in self.methods for name in ROUNDING_METHODS):
            found.append("methods: adaround and block-reconstruction both learn the rounding: choose one")
        if self.weight_bits_budget != 0 and not 2 <= self.weight_bits_budget <= 8:
            found.append(f"weight_bits_budget must be 0 (off) or between 2 and 8 (got {self.weight_bits_budget})")
        for name in ("edge_bits", "add_bits"):
            value = getattr(self, name)
            if value != 0 and not MIN_BITS <= value <= MAX_BITS:
                found.append(f"{name} must be 0 (off) or between {MIN_BITS} and {MAX_BITS} (got {value})")
        if self.edge_bits and self.weight_bits_budget:
            found.append("edge_bits and weight_bits_budget both choose layers' bits: set one of them")
        unknown = [] if layers is None else [name for name in self.float_layers if name not in layers]
        if unknown:
            listed = shorten(", ".join(unknown), 200)
            found.append(f"float_layers: unknown layer(s) {listed}; layers are {shorten(', '.join(layers or ()), 200)}")
        return found

    def validate(self, layers: Sequence[str] | None = LAYER_NAMES) -> QuantConfig:
        problems = self.problems(layers)
        if problems:
            raise ConfigError(problems)
        return self

    @property
    def max_bits(self) -> int:
        """The widest integer any tensor uses (the integer paths take at most 8)."""
        return max(self.weight_bits, self.act_bits, self.edge_bits, self.add_bits)

    @property
    def bits_label(self) -> str:
        """For example W4A4, or with edge_bits and add_bits "W2A2, first and last layers at 8, adds at 8"."""
        label = f"W{self.weight_bits}A{self.act_bits}"
        if self.edge_bits:
            label += f", first and last layers at {self.edge_bits}"
        return f"{label}, adds at {self.add_bits}" if self.add_bits else label

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["float_layers"] = list(self.float_layers)
        data["methods"] = list(self.methods)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, object], layers: Sequence[str] | None = None) -> QuantConfig:
        """Strict: unknown keys or bad values raise ConfigError. float_layers are checked against
        `layers` when given (a stored config's model is checked when it is quantized)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError([f"unknown setting(s): {', '.join(unknown)}"])
        return make_config(layers, **data)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        """Strict, and bounded like any JSON from a file (qcore.files.read_json): ConfigError otherwise."""
        try:
            data = read_json(text, "config", MAX_CONFIG_CHARS)
        except ValueError as error:
            raise ConfigError([str(error)]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"config must be a JSON object (found {type(data).__name__})"])
        return cls.from_dict(data)

    def to_query(self) -> dict[str, str]:
        """URL query parameters for the settings that differ from the defaults."""
        default = QuantConfig()
        query = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                query[f.name] = _query_text(value)
        return query

    @classmethod
    def from_query(
        cls, query: Mapping[str, str], offered: Offered | None = None, layers: Sequence[str] | None = LAYER_NAMES
    ) -> tuple[QuantConfig, list[str]]:
        """A config from URL query parameters, lenient: each bad value is replaced by the default
        and explained in the returned warnings (one line each; any text from the URL in them is
        shortened, and callers must still show them as plain text). With `offered`, values are
        also bounded by what the dashboard offers; float_layers must name `layers` (the model's)."""
        warnings: list[str] = []
        config = cls()
        known = {f.name: f for f in fields(cls)}
        # A fixed order, whatever order the URL used; batch_size first, since it bounds calib_batches.
        for key in sorted(known, key=lambda name: name != "batch_size"):
            if key not in query:
                continue  # other pages' parameters share the query string
            text = str(query[key])
            fallback = _query_text(getattr(config, key)) or "none"
            if len(text) > MAX_QUERY_VALUE:
                warnings.append(f"ignored {key}: its value is {len(text)} characters long; using {fallback}")
                continue
            try:
                value = _parse_query_value(key, text, type(getattr(config, key)))
                candidate = make_config(layers, **{**config.to_dict(), key: value})
                if offered is not None:
                    _check_offered(candidate, key, offered)
            except (ValueError, ConfigError) as error:
                warnings.append(f"ignored {key}={shorten(text)!r}: {shorten(str(error), 160)}; using {fallback}")
                continue
            config = candidate
        return config, warnings

    def with_changes(self, layers: Sequence[str] | None = None, **changes: object) -> QuantConfig:
        """A copy with `changes`, validated (float_layers against `layers` when given; quantizing
        checks them against the model's graph in any case)."""
        return replace(self, **changes).validate(layers)


def max_calib_batches(batch_size: int) -> int:
    return -(-TRAIN_SIZE // batch_size)


def _check_offered(config: QuantConfig, key: str, offered: Offered) -> None:
    if key in ("weight_bits", "act_bits") and getattr(config, key) not in offered.bits:
        raise ValueError(f"the dashboard offers {', '.join(map(str, offered.bits))} bits")
    if key in ("edge_bits", "add_bits") and getattr(config, key) not in (0, *offered.bits):
        raise ValueError(f"the dashboard offers 0 (off) or {', '.join(map(str, offered.bits))} bits")
    if key == "batch_size" and config.batch_size not in offered.batch_sizes:
        raise ValueError(f"the dashboard offers batch sizes {', '.join(map(str, offered.batch_sizes))}")
    if key in ("calib_batches", "batch_size"):
        limit = offered.max_calib_batches(config.batch_size)
        if config.calib_batches > limit:
            raise ValueError(
                f"the dashboard calibrates on at most {offered.max_calib_images} images "
                f"({limit} batches of {config.batch_size})"
            )


def integer_path_problems(config: QuantConfig) -> list[str]:
    """Why the integer engine, ONNX Runtime or an export cannot run this config, known before any
    calibration: every layer and the input must be quantized, at 8 bits or fewer."""
    problems = []
    if config.float_layers:
        problems.append(f"every layer must be quantized (float: {', '.join(config.float_layers)})")
    if not config.quantize_input:
        problems.append("the input must be quantized (drop --float-input)")
    if config.weight_bits > 8 or config.act_bits > 8:
        problems.append(f"at most 8 bits fit int32 accumulators (got W{config.weight_bits}A{config.act_bits})")
    if config.edge_bits > 8:
        problems.append(f"at most 8 bits fit int32 accumulators (got first and last layers at {config.edge_bits})")
    if config.add_bits > 8:
        problems.append(f"the integer engine's adds take at most 8 bits (got adds at {config.add_bits})")
    return problems


# The type each setting must have, exactly: 2.0 == 2 and True == 1 in Python, so a file's 2.0 or
# true would otherwise pass every range check and then be shown and keyed as a different value.
_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "weight_bits": (int,),
    "act_bits": (int,),
    "calib_batches": (int,),
    "batch_size": (int,),
    "seed": (int,),
    "observer": (str,),
    "granularity": (str,),
    "scheme": (str,),
    "weight_range": (str,),
    "quantize_input": (bool,),
    "weight_bits_budget": (int, float),  # a whole budget (4) is as good as 4.0
    "edge_bits": (int,),
    "add_bits": (int,),
}


def _type_problems(values: Mapping[str, object]) -> list[str]:
    problems = []
    for key, value in values.items():
        allowed = _SETTING_TYPES.get(key)
        if allowed is not None and type(value) not in allowed:
            wanted = " or ".join("a whole number" if t is int else t.__name__ for t in allowed)
            problems.append(f"{key} must be {wanted} (got {shorten(repr(value), 40)}, a {type(value).__name__})")
    return problems


def make_config(layers: Sequence[str] | None = LAYER_NAMES, **values: object) -> QuantConfig:
    """QuantConfig(**values), validated (float_layers against `layers`, the model's), every setting of
    its exact type (no 2.0 for 2, no True for 1)."""
    for key in ("float_layers", "methods"):
        if key in values:
            values[key] = _as_names(values[key])
    try:
        config = QuantConfig(**values)  # type: ignore[arg-type]
    except TypeError as error:
        raise ConfigError([str(error)]) from error
    return config.validate(layers)


def _as_names(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(part, str) for part in value):
        return tuple(value)
    raise ConfigError([f"expected a list of names or a comma-separated string (got {shorten(repr(value), 40)})"])


def _query_text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


_WHOLE = re.compile(r"-?[0-9]{1,20}")
_DECIMAL = re.compile(r"[0-9]{1,3}(\.[0-9]{1,6})?")


def _parse_query_value(key: str, text: str, kind: type) -> object:
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError("expected 1 or 0")
    if kind is int:
        # ASCII digits only (int() also takes '+4', ' 4', '4_0' and '٤'); the range is the config's to check
        if not _WHOLE.fullmatch(text):
            raise ValueError("expected a whole number in digits 0-9")
        return int(text)
    if kind is tuple:
        return _as_names(text)
    if kind is float:
        if not _DECIMAL.fullmatch(text):
            raise ValueError("expected a number like 4 or 4.5")
        return float(text)
    return text
