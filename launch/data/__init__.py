"""Data: what a dataset hands the loop (`types`), the order every rank sees it in (`order`),
feeding batches to the device (`feeder`), and the datasets (`synthetic`, `tabular`, `mnist`,
`custom`), chosen by `build`."""
