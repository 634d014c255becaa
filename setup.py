from setuptools import find_packages, setup

setup(
    name='sora_jax',
    version='0.1.0',
    description='Train and sample Sora-style text-to-video diffusion transformers in JAX.',
    packages=find_packages(include=['sora_jax', 'sora_jax.*', 'data_pipelines', 'data_pipelines.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.10,<0.11',
        'flax==0.12.8',  # NNX sharding metadata keywords change between releases: pinned, tested
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8,<0.13',
        'grain>=0.2.18,<0.3',
        'ml_collections>=1.1',
        'absl-py>=2.1',
        'av>=14',  # PyAV: video encode/decode through FFmpeg
        'numpy>=2',
        'tensorboardX>=2.6',  # TensorBoard event files without TensorFlow
        'array_record>=0.8',  # our prepared shards (grain reads them natively)
        'tensorflow-datasets>=4.9.10,<4.10',  # captioned-video builder; array_record needs no TF
        'safetensors>=0.4',  # weight import (Wan 2.1, UMT5) from Hugging Face folders
        'sentencepiece>=0.2',  # UMT5/T5 tokenizer
        'importlib_resources',  # TFDS 4.9.10 imports it but declares it only for py<3.9
    ],
    extras_require={
        # libtpu (from the package registry): run on TPU, and compile for TPU topologies from any
        # machine (python -m sora_jax.compile).
        'tpu': ['jax[tpu]>=0.10,<0.11'],
        # The CUDA compiler alone (no GPU, no CUDA libraries): python -m sora_jax.compile for
        # --topology=h100-8 / h200-8 from any machine. On a GPU machine install jax[cuda12].
        'cuda-compile': ['jax-cuda12-plugin>=0.10,<0.11', 'jax-cuda12-pjrt>=0.10,<0.11'],
        'test': ['pytest>=8', 'jax[tpu]>=0.10,<0.11'],  # tests compile for a TPU topology on CPU
    },
)
