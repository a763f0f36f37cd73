"""JSON text for the result dataclasses, from their ``to_dict`` / ``from_dict``."""

import json


class JsonRoundTrip:
    """Mixin: ``to_json()`` and ``from_json()`` for a class with ``to_dict`` / ``from_dict``."""

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))
