"""vit_jax: vision transformers in JAX/Flax. `pip install -e .[test]`."""
import setuptools

setuptools.setup(
    name="vit_jax",
    version="0.1.0",
    description="Vision transformers (ViT, hybrids, Swin) in JAX/Flax: models, training, experiments.",
    packages=setuptools.find_packages(include=["vit_jax", "vit_jax.*"]),
    # ImageNet-1k/21k class names for vit_jax.predict.
    package_data={"vit_jax": ["*_classes.txt"]},
    python_requires=">=3.10,<3.13",
    # Ranges are the ones tested here (Python 3.11); the lower bounds are the versions whose APIs
    # the code uses, the upper bounds the next major/minor release nobody has run yet.
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "ml-collections>=1.1.0,<1.2",
        "tensorflow-cpu>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10,<4.10",
        # Imported by TFDS 4.9.10's builders (download_and_prepare) but not among its requirements
        # on Python >= 3.9.
        "importlib_resources>=7.1,<8",
        "clu>=0.0.12,<0.1",
        "tensorboard>=2.21,<2.22",
        "matplotlib>=3.9,<4",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "scipy>=1.13,<2",
    ],
    extras_require={
        # pycocotools: tests/detection/test_mean_ap.py checks our COCO mAP against it.
        "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "pytest-timeout>=2.3,<3", "filelock>=3.12,<4", "pycocotools>=2.0.8,<2.1"],
        # Parity tests and side-by-side benchmarks only; never imported by vit_jax itself.
        "torch": ["torch==2.13.0", "transformers>=5.23,<5.24"],
        # Hugging Face weights in and out (vit_jax.pretrained), imported only when used; reading
        # model.safetensors needs no torch, pytorch_model.bin and the parity tests do.
        "hf": ["transformers>=5.23,<5.24", "safetensors>=0.8,<0.9", "huggingface_hub>=2.4,<3"],
        # vit_jax.plan: the TPU compiler (libtpu 0.0.42.1 with jax 0.10.2), which compiles train
        # steps for TPU pod slices on a machine without TPUs (~700 MB installed).
        "plan": ["jax[tpu]>=0.10.2,<0.11"],
        # vit_jax.export: ONNX through tf2onnx's TFLite reader, checked with ONNX Runtime (the
        # SavedModel and TFLite exports need only TensorFlow). jax2onnx is not used: it pins
        # orbax-checkpoint < 0.11.37.
        "export": ["tf2onnx>=1.17,<1.18", "onnx>=1.23.2,<1.24", "onnxruntime>=1.32,<1.33"],
        # notebooks/vit_jax.ipynb's kernel and tests/test_notebook.py, which runs it (tested with
        # nbclient 0.11.0, nbformat 5.11.1, ipykernel 7.4.0).
        "notebook": ["nbclient>=0.10,<0.12", "nbformat>=5.10,<6", "ipykernel>=6.29,<8"],
    },
)
