"""The released TransFace checkpoints: file name, backbone name and the IJB-C TAR the official README reports.

One place for these facts: tools/reproduce_zoo.py reads them, and `python -m eval.zoo` prints the markdown table
the README shows. The official README names one download, glint360k_model_TransFace_L.pt; the other five follow
the same pattern (<training data>_model_TransFace_<size>.pt) here, so save the downloads under these names.
"""
import math
from dataclasses import dataclass, field

from eval.ijb import FAR_TARGETS


@dataclass(frozen=True)
class ZooEntry:
    data: str  # training set
    model: str
    file: str  # file name of the download
    network: str  # backbones.get_model name the file loads into (strictly)
    url: str
    ijbc_tar: tuple  # published IJB-C TAR (%) at FAR_TARGETS
    network_kwargs: dict = field(default_factory=dict)  # extra get_model arguments (tiny test models)


def _entry(data, size, network, file_id, tar):
    return ZooEntry(data, f"TransFace-{size}", f"{data.lower()}_model_TransFace_{size}.pt", network,
                    f"https://drive.google.com/file/d/{file_id}/view?usp=share_link", tar)


ZOO = (
    _entry("MS1MV2", "S", "vit_s_dp005_mask_0", "1UZWCg7jNESDv8EWs7mxQSswCMGbAZNF4",
           (86.75, 93.87, 96.45, 97.51, 98.34, 98.99)),
    _entry("MS1MV2", "B", "vit_b_dp005_mask_005", "16O-q30mH8d3lECqa5eJd8rABaUlNhQ0K",
           (86.73, 94.15, 96.55, 97.73, 98.47, 99.11)),
    _entry("MS1MV2", "L", "vit_l_dp005_mask_005", "1uXUFT6ujEPqvCTHzONsp6-DMIc24Cc85",
           (86.90, 94.55, 96.59, 97.80, 98.45, 99.04)),
    _entry("Glint360K", "S", "vit_s_dp005_mask_0", "18Zh_zMlYttKVIGArmDYNEchIvUSH5FQ1",
           (89.93, 96.06, 97.33, 98.00, 98.49, 99.11)),
    _entry("Glint360K", "B", "vit_b_dp005_mask_005", "13IezvOo5GvtGVsRap2s5RVqtIl1y0ke5",
           (88.64, 96.18, 97.45, 98.17, 98.66, 99.23)),
    _entry("Glint360K", "L", "vit_l_dp005_mask_005", "1jXL_tidh9KqAS6MgeinIk2UNWmEaxfb0",
           (89.71, 96.29, 97.61, 98.26, 98.64, 99.19)),
)


def far_label(far):
    """1e-06 -> '1e-6', as the README and the paper write FARs."""
    return f"1e{round(math.log10(far))}"


def markdown_table(zoo=ZOO):
    """The model zoo table (training data, linked model, --network, published IJB-C TAR) in markdown."""
    lines = ["| Training data | Model | `--network` | IJB-C " + " | ".join(map(far_label, FAR_TARGETS)) + " |",
             "| --- | --- | --- |" + " ---: |" * len(FAR_TARGETS)]
    for e in zoo:
        lines.append(f"| {e.data} | [{e.model}]({e.url}) | `{e.network}` | "
                     + " | ".join(f"{v:.2f}" for v in e.ijbc_tar) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
