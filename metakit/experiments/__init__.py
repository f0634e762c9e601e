"""The priming experiment (Gheini et al.): cross-lingual WikiAnn NER, seven settings, one command."""
