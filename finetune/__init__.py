"""edge_tl.finetune: fine-tune a pretrained timm backbone on an ImageFolder (stage 1)."""
