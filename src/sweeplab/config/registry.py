"""Name -> builder registries whose keyword-only parameters become the config group's schema.

YAML names a builder (``model.name: mlp``) instead of an import path, so renaming a module never
breaks a saved config. Registering a builder also stores a structured-config schema in Hydra's
ConfigStore (``schema/<group>/<name>``, named first in each option's defaults list), derived
from the builder's keyword-only parameters, so a typo'd key or a wrong type fails at
composition and names the key.
"""

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar, get_args, get_origin

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sweeplab.config.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass
class NamedConfig:
    """Fields every option of a registry-backed group has."""

    name: str = "???"


class Registry(Generic[T]):
    """Builders for one config group, looked up by ``cfg.name``.

    A builder's positional parameters are what the framework passes in (input size, optimizer,
    ...); its keyword-only parameters, with type hints and defaults, are the YAML keys.
    """

    def __init__(self, group: str, base: type = NamedConfig) -> None:
        self.group = group
        self.base = base
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register ``builder`` under ``name`` and store its schema for Hydra."""

        def decorator(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ValueError(f"{self.group} {name!r} is registered twice")
            self._builders[name] = builder
            ConfigStore.instance().store(
                group=f"schema/{self.group}", name=name, node=self._schema(name, builder)
            )
            return builder

        return decorator

    @property
    def names(self) -> list[str]:
        return sorted(self._builders)

    def build(self, cfg: DictConfig, *args: Any) -> T:
        """Call the builder named by ``cfg.name`` with ``args`` and the config's own keys."""
        builder = self._builders.get(cfg.name)
        if builder is None:
            raise ConfigError(
                f"{self.group}.name={cfg.name!r} is not registered: expected one of {self.names}."
            )
        base_keys = {f.name for f in dataclasses.fields(self.base)}
        kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in base_keys}
        return builder(*args, **kwargs)

    def _schema(self, name: str, builder: Callable[..., T]) -> type:
        hints = inspect.get_annotations(
            builder.__init__ if inspect.isclass(builder) else builder, eval_str=True
        )
        fields = []
        for param in inspect.signature(builder).parameters.values():
            if param.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if param.default is inspect.Parameter.empty:
                raise TypeError(f"{self.group} {name!r}: keyword-only {param.name!r} needs a default")
            default = param.default
            spec = (
                dataclasses.field(default_factory=lambda d=default: list(d))
                if isinstance(default, (list, tuple))
                else dataclasses.field(default=default)
            )
            fields.append((param.name, _omegaconf_type(hints.get(param.name, Any)), spec))
        fields.append(("name", str, dataclasses.field(default=name)))
        return dataclasses.make_dataclass(
            f"{name.title().replace('_', '')}{self.group.title()}Config", fields, bases=(self.base,)
        )


def _omegaconf_type(hint: Any) -> Any:
    """OmegaConf types lists as ``list[X]``; builders take any ``Sequence[X]``."""
    if get_origin(hint) is Sequence:
        return list[get_args(hint)]  # type: ignore[misc]
    return hint
