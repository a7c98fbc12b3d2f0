"""KLEJ, the Polish language-understanding benchmark: Curie-7B's second result, reproduced.

    tasks.py      the nine tasks (columns, labels, metric, epochs) and readers for the files as distributed
    metrics.py    accuracy, binary F1, Spearman, AR's 1 - wMAE/4, in numpy
    templates.py  an example's fields -> [BOS] text ids (pairs joined under Polish field labels)
    head.py       the decoder as a classifier/regressor: a linear head on the last real token
    finetune.py   Curie's recipe: task LoRA (r=2 on wq, wv), class-weighted loss, early stopping on dev
    submit.py     test_pred_<task>.tsv files and the nine-file submission zip
    results.py    the table of finished tasks
    demo.py       the whole pipeline on a task built from Polish fortunes (fortunes-pl), no KLEJ data needed;
                  downloads fortunes-pl and SmolLM2 on first use, then runs offline
    __main__.py   python -m klej finetune | evaluate | predict | results | submit | demo
"""
