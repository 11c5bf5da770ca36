"""Planning a run: from a corpus, a device and a time budget to the model, vocabulary and settings to train
(``minillm plan``, ``analyze-corpus``'s recommendations and ``train --config auto``)."""
