"""`make demo`: build every EPSANet model and classify one example image.

(The fine-tuning issue turns this into the full job: data set, fine-tune, validate, extract.)
"""
import timm
import torch

import epsanet


def main() -> None:
    torch.manual_seed(0)
    for name in epsanet.MODEL_NAMES:
        model = timm.create_model(name).eval()
        cfg = timm.data.resolve_data_config({}, model=model)
        image = torch.rand(1, *cfg['input_size'])
        with torch.inference_mode():
            logits = model(image)
        params = sum(p.numel() for p in model.parameters())
        print(f'{name:<18} {params:>12,} params  logits {tuple(logits.shape)}  top class {logits.argmax().item()}')


if __name__ == '__main__':
    main()
