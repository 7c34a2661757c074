"""Stage 6, DeViSE (Frome et al. 2013; lesson 9, 2017): images -> word vectors, evaluated by hit@k
(flat and zero-shot) and searched both ways.

Fast path (the references'): the backbone's body is frozen, so its pooled activations are
computed once per image (and per horizontal flip) into an HDF5 store (``features``); the head trains
on those in minutes, next to a softmax classifier with the same head and schedule, the DeViSE
paper's baseline (``head``). Fine-tuning (optional) then trains body and head end to end from the
image store (``finetune``). Classes with no word vector are excluded and listed; the zero-shot
classes are held out of training entirely (``classes``). Every model stage writes
``embeddings.h5``, from which evaluation (``evaluate``) and the search index (``search``) are built.
"""
