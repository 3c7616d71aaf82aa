"""Reading, checking and batching the data: tables and the Hub, labels, splits, NER and MLM readers, collation."""
