"""Which steps of each site an outer model holds: a map that travels with the model, so that a site taking
another site's state knows exactly which of its own steps to train again (docs/sites.md, "What a dropped
round costs").

The outer model of round r is the one of round r - 1 plus the outer gradients of the sites averaged in
round r, all started from that model (the digest of the model each gradient starts from travels with it,
and one from another model is left out). A site's outer gradient holds its inner steps since the model it
started from, up to its inner step at the round, which travels with the gradient (shoal/sites/wire.py). So
`steps[s]`, the last inner step of site s whose outer gradient is in the model, is the previous model's map
with each averaged site's step of the round. The map is exact by construction, whichever site the model
is taken from: after a cut between the two halves of an exchange, or with sites split into groups, the
model taken says which of the taker's steps it holds, whatever the taker believed.

It travels in the metadata of the state's safetensors (a JSON object of site name -> step), read from the
header without unpickling anything, and in the leader's checkpoint beside DiLoCo's state.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

METADATA_KEY = "shoal.site_steps"


@dataclass
class SiteSteps:
    """site name -> the last inner step of that site whose outer gradient is in this outer model."""

    steps: dict[str, int] = field(default_factory=dict)

    def averaged(self, steps: dict[str, int]) -> None:
        """The model now also holds these sites' outer gradients of a round, each up to its step then."""
        self.steps.update(steps)

    def step_of(self, site: str) -> int:
        """The step after which `site`'s data is in no part of this model (0: none of it is)."""
        return self.steps.get(site, 0)

    def metadata(self) -> dict[str, str]:
        """The map as safetensors metadata (string values only)."""
        return {METADATA_KEY: json.dumps(dict(sorted(self.steps.items())))}

    @classmethod
    def from_safetensors(cls, blob: bytes) -> SiteSteps:
        """The map in a state's safetensors header; ValueError when it is missing or not a map of steps."""
        # The format: an 8-byte little-endian header length, then the JSON header (its "__metadata__").
        if len(blob) < 8 or struct.unpack("<Q", blob[:8])[0] > len(blob) - 8:
            raise ValueError("malformed state from another site: no safetensors header")
        try:
            header = json.loads(blob[8:8 + struct.unpack("<Q", blob[:8])[0]])
            steps = json.loads(header["__metadata__"][METADATA_KEY])
        except (ValueError, KeyError, TypeError):
            raise ValueError("the state from another site does not say which steps of each site it holds "
                             f"({METADATA_KEY} in its metadata)") from None
        if not isinstance(steps, dict) or not all(isinstance(k, str) and type(v) is int and v >= 0
                                                  for k, v in steps.items()):
            raise ValueError(f"the state from another site has a {METADATA_KEY} that is not site name -> step")
        return cls(steps)
