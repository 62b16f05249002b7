"""Install with `pip install -e .` (scripts/setup.sh does this inside a virtualenv)."""

from setuptools import find_packages, setup

setup(
    name="bert-deepspeed",
    version="0.1.0",
    description="BERT pretraining on DeepSpeed: offline data prep, fused model, exact resume, multi-node.",
    python_requires=">=3.10",
    # ds_configs/ is a package too, so the DeepSpeed JSON ships in the wheel (found through importlib.resources)
    packages=find_packages(include=["common", "data_prep*", "pretrain*", "finetune*", "embed*", "ds_configs"]),
    package_data={"": ["*.json"], "pretrain": ["recipes/*.yaml"]},
    install_requires=[
        # torch is left loose on purpose: clusters bring their own CUDA build.
        "torch>=2.4",
        "deepspeed>=0.19,<0.20",
        "transformers>=5.0,<6",
        "tokenizers>=0.22,<0.24",
        "sentencepiece==0.2.3",  # bert-prep vocab --model unigram: deterministic where tokenizers' is not
        "safetensors>=0.4",
        "numpy>=1.26,<2.6",
        "blingfire>=0.1.8,<0.2",
        "zstandard>=0.22",
        "pyarrow>=15",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "hjson>=3.1",
        "xxhash>=3.4,<5",  # dataset and checkpoint checksums (data_prep.indexed, pretrain.runtime.integrity): XXH3-128
    ],
    extras_require={
        "logging": ["tensorboard>=2.16", "wandb>=0.17"],
        # bert-embed: the sentence-transformers format its output is tested against, BM25, the IR metrics and
        # FAISS (bert-embed index/search, imported only there), mteb (embed.mteb_model, imported only there)
        "embed": [
            "sentence-transformers==6.3.0",
            "faiss-cpu==1.15.1",
            "mteb==2.26.24",
            "bm25s==0.3.16",
            "ir-measures==0.4.3",
            "pytrec-eval-terrier==0.5.11",
        ],
        "dev": [
            "pytest>=8",
            "pytest-timeout==2.4.0",  # a hung test fails with every thread's stack instead of stalling the suite
            "ruff==0.17.5",
            "megatron-core==0.16.1",
            "scikit-learn>=1.4",
            "seqeval==1.2.2",
            "datasets==5.2.0",
            "torch-optimi==0.3.3",  # the reference StableAdamW that tests/test_optim.py checks ours against
            "setuptools>=70.1",  # tests/test_wheel.py builds the wheel without build isolation (no index needed)
        ],
    },
    entry_points={
        "console_scripts": [
            "bert-prep=data_prep.cli:main",
            "bert-pretrain=pretrain.train:cli",
            "bert-bench=pretrain.bench:cli",
            "bert-export=pretrain.export:cli",
            "bert-report=pretrain.report:cli",
            "bert-finetune=finetune.run:cli",
            "bert-glue=finetune.suite:cli",
            "bert-embed=embed.cli:main",
        ]
    },
)
