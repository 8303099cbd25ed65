"""The ZipIt! paper's experiments on zipjax: data, training of source models, evaluation."""
