module ml-serving/node

go 1.25
