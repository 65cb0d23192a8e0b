"""Classify image files: `python predict.py CHECKPOINT_OR_DEPLOYED IMAGE_OR_FOLDER... [--out predictions.csv]`.

Writes a CSV (file, class, confidence, top-k) using the model's own preprocessing; see README.md (Predict).
"""
from flgc_lightning.predict import main

if __name__ == "__main__":
    main()
