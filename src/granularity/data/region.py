"""The canonical annotated region that every reader yields."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Region:
    """One annotated image area with its nucleus instances.

    Attributes:
        name: unique name of the region within its dataset, used in file names.
        group: the slide or tile the region was cut from. Splits never put two
            regions of one group into different subsets.
        image: H x W x 3 uint8 RGB pixels.
        instances: H x W int32 instance map, 0 = background, one id per
            nucleus. Ids need not be contiguous.
        classes: instance id -> project class index (0-based, in class-map
            order). Every id present in ``instances`` has an entry.
        source: path of the file the annotations were read from, for messages.
    """

    name: str
    group: str
    image: np.ndarray
    instances: np.ndarray
    classes: dict[int, int] = field(default_factory=dict)
    source: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.instances.shape[0]), int(self.instances.shape[1])

    def instance_ids(self) -> np.ndarray:
        """Return the sorted nucleus ids present in the instance map."""
        ids = np.unique(self.instances)
        return ids[ids != 0]

    def class_map_image(self) -> np.ndarray:
        """Return the H x W uint8 class mask: 0 background, class index + 1 per nucleus."""
        lookup = np.zeros(int(self.instances.max(initial=0)) + 1, dtype=np.uint8)
        for instance_id, class_index in self.classes.items():
            if instance_id < lookup.size:
                lookup[instance_id] = class_index + 1
        return lookup[self.instances]
